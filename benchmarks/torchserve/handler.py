"""TorchServe handler of the serving benchmark: the same request body as Refit's predict
(JSON ``{"images": [base64 JPEG], "top_k"}``), the same preprocessing (short side to 256,
centre crop 224, ImageNet normalisation), a batched forward of a TorchScript model and the
top-k labels with scores. Runs inside TorchServe's worker (its own venv: torch and Pillow)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
RESIZE, CROP = 256, 224


def _crop(raw: bytes) -> torch.Tensor:
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = img.size
    scale = RESIZE / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - CROP) // 2, (h - CROP) // 2
    img = img.crop((left, top, left + CROP, top + CROP))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(CROP, CROP, 3)
    return (x.permute(2, 0, 1).float().div(255) - MEAN) / STD


class Handler(BaseHandler):
    """Decode, preprocess, batch, forward, top-k."""

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        self.top_k = []
        crops = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            self.top_k.append(int(body.get("top_k", 5)))
            crops.append(_crop(base64.b64decode(body["images"][0])))
        return torch.stack(crops)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(data)

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        probs = data.softmax(1)
        out = []
        for p, k in zip(probs, self.top_k, strict=True):
            scores, labels = p.topk(k)
            out.append(
                {
                    "predictions": [
                        [
                            {"label": str(int(i)), "score": float(s)}
                            for s, i in zip(scores, labels, strict=True)
                        ]
                    ]
                }
            )
        return out

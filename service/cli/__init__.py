"""The ``refit`` command line.

* ``main``: one function per command, then the parser (:func:`main`, the ``refit`` entry
  point; ``__main__``: ``python -m service.cli``, how ``refit up`` restarts itself);
* ``loop``: the adaptation loop's commands (``refit capture``, ``feedback``, ``quality``,
  ``policy``);
* ``client``: the HTTP client of the remote commands (URL and token from settings or the data
  dir's ``connection.json``);
* ``console``: what ``refit up`` prints (each job's start, epochs and end) and Ray's output
  sent to the data dir's log files.
"""

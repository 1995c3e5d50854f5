"""trainctl: what server, workers, client and the attach SDK share."""


def init(*args, **kwargs):
    """`trainctl.init(name=..., config=...)`: attach this process's training loop (see
    trainctl/attach/). Imported lazily so `import trainctl` stays cheap for the server."""
    from trainctl.attach import init as _init
    return _init(*args, **kwargs)

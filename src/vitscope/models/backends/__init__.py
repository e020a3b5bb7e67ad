"""One backend per model library: each adapts that library's ViTs to :class:`~vitscope.models.backends.base.Backend`."""

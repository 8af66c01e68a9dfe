"""pytest plugin for running timm's own test suite on models patched by :func:`fastvit.patch_timm_`.

Loaded with ``-p fastvit_patch_plugin`` (this folder on ``PYTHONPATH``) before timm's ``tests/test_models.py`` is
imported, it wraps ``timm.create_model`` so every model a test creates is patched in place. With
``FASTVIT_PATCH_TIMM=0`` it wraps nothing (the plain-timm baseline run). After the session it writes the number of
modules it patched to ``$FASTVIT_PATCH_COUNT_FILE`` (when set; one line per process, as pytest-xdist runs several),
so the caller can tell the patching really happened.
"""

from __future__ import annotations

import functools
import os

import timm
import timm.models

_PATCHED_MODULES = 0


def _wrap(create_model):
    @functools.wraps(create_model)
    def create_and_patch(*args, **kwargs):
        global _PATCHED_MODULES
        import fastvit
        from fastvit.integrations.timm import patch_report

        model = create_model(*args, **kwargs)
        fastvit.patch_timm_(model)
        _PATCHED_MODULES += sum(r.status != "not covered" and r.status != "unpatched" for r in patch_report(model))
        return model

    return create_and_patch


if os.environ.get("FASTVIT_PATCH_TIMM", "1") != "0":
    timm.create_model = _wrap(timm.create_model)
    timm.models.create_model = _wrap(timm.models.create_model)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FASTVIT_PATCH_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{_PATCHED_MODULES}\n")

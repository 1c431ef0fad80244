"""``distrifusion demo``: a browser page for the served pipeline (prompt, settings, live progress and
previews, the final image, Stop) and the same-origin proxy that streams from Triton for it."""

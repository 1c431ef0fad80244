"""The one home of every user-facing name and default: schedulers, generation options, mode, warm-up.

The command line, the served settings, the clients and the denoising loop all read them from here.
Plain constants only, so that light code (the Triton clients) can import it without torch.
"""

SCHEDULERS = ("ddim", "euler", "euler-a", "dpmpp-2m")
DEFAULT_SCHEDULER = "euler"
DEFAULT_STEPS = 20
MAX_STEPS = 200  # the default per-deployment limit (model config parameter max_steps) and the CLI's
DEFAULT_GUIDANCE = 5.0
DEFAULT_SEED = 0
DEFAULT_HEIGHT = 512
DEFAULT_WIDTH = 512

DEFAULT_MODE_NAME = "corrected_async_gn"
DEFAULT_WARMUP_STEPS = 4

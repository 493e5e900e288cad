"""Suite-wide settings: offline model hubs, quiet libp2p, one torch thread."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("libp2p").setLevel(logging.CRITICAL)

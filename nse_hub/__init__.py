"""nse-hub: edit facts inside Hugging Face language models with NSE and ship the edits as PEFT adapters."""

from nse_hub._version import __version__
from nse_hub.config import EditConfig
from nse_hub.report import RoundReport
from nse_hub.requests import EditRequest, Probe, load_requests
from nse_hub.session import EditSession

__all__ = ["EditConfig", "EditRequest", "EditSession", "Probe", "RoundReport", "__version__", "load_requests"]

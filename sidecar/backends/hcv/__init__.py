"""Kong's ``hcv`` vault: HashiCorp Vault KV v1/v2 through hvac.

``settings`` (Kong's fields and rules), ``auth`` (clients and the token lifecycle) and
``backend`` (the read path); imports point one way, backend -> auth -> settings.
"""

from sidecar.backends.hcv.backend import KIND, HcvBackend, check
from sidecar.backends.hcv.settings import HcvSettings

__all__ = ["KIND", "HcvBackend", "HcvSettings", "check"]

"""The network guard's old import path: it lives in `stylequeue.pipeline.storage.netguard` now.

This name is bound to that very module object (not a copy of its names), so code importing either
path, and a test that monkeypatches either, sees and changes the same functions.
"""

import sys

from stylequeue.pipeline.storage import netguard as _netguard

sys.modules[__name__] = _netguard

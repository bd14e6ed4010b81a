"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

The interpreter is chosen when Triton is first imported, so the variable is set here, at conftest
import time, before any test module imports triton or a velotune kernel.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

"""Tests run the Triton kernels on CPU through Triton's interpreter.

The interpreter is chosen when Triton is first imported, so the variable is set here, at the root
conftest's import time, before any test module imports triton or a velotune kernel. In the default
`auto` kernel mode CPU tensors still take the reference path, so this only matters where a test
asks for the Triton path.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

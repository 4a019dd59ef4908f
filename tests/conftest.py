import os

# Triton kernels run on the CPU through the interpreter in tests (read when triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

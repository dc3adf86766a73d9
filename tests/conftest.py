import os

# The Triton backend runs on CPU tensors through Triton's interpreter; the variable must be
# set before Triton decorates any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

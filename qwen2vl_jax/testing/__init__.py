"""What examples, notebooks and tests share: the tiny random demo checkpoint (`demo.py`)."""

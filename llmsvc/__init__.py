"""llmsvc: a durable LLM service layer.

Whatever a client has received, the store holds — exactly once, in order —
after any crash and recovery.
"""

__version__ = "0.1.0"

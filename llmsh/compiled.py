"""Compiled decode step (placeholder: eager only)."""
def setup_decoder(decoder, *, max_new_tokens=0, compile=False, notice=None):
    return {"compiled": False, "compile_s": 0.0}

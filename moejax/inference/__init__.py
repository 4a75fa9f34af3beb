"""Generation: the compiled prefill/decode loop and sampling."""

"""Model definitions (Llama family), weight loading, tokenizers and sampling."""

"""Tiny random-weight models built from transformers config classes, for the tests, the coverage table and the
demo. Nothing here is imported by ``import mmkv_compile``."""

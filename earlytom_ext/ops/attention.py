"""Placeholder: attention_received wrapper."""


def attention_received(*a, **k):
    raise NotImplementedError

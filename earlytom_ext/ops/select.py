"""Placeholder: Stage II wrappers."""


def select_tokens(*a, **k):
    raise NotImplementedError


def stage2_plan(*a, **k):
    raise NotImplementedError

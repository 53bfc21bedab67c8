"""Integrations with training frameworks, each an optional extra.

``async_ckpt.integrations.lightning`` (extra ``lightning``) and
``async_ckpt.integrations.accelerate`` (extra ``accelerate``); importing one
imports its framework, so nothing here is imported by ``async_ckpt`` itself.
"""

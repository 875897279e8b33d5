"""Upstream providers: one package per web-chat service."""

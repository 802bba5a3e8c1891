"""Talking to a fedem hub over HTTP: `HubClient` (push, pull, lease) and its error types."""

from fedem.client.hub_client import HubAPIError, HubClient, Transfer, TransferError, sha256_file

__all__ = ["HubAPIError", "HubClient", "Transfer", "TransferError", "sha256_file"]

"""The fedem hub: releases, adapters, contributors and leases behind a FastAPI app (`create_app`)."""

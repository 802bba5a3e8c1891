"""One router per resource; `fedem.hub.app.create_app` mounts them."""

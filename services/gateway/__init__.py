"""The API gateway: the one public entry point, proxying to the Orders and Payments services."""

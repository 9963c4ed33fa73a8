"""edgehook: GPIO and MQTT events to durable webhooks, and webhooks to GPIO."""

__version__ = "0.1.0"

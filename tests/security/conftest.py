"""Fixtures of the security suite: each service's app on the test database and Redis prefix."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import create_service_app

#: as deployed: the sender's webhook secret is set (else its webhook honestly answers 503)
WEBHOOK_SECRET = "whsec_" + "c2VjdXJpdHktc3VpdGUtd2ViaG9vay1zZWNyZXQ="


@pytest.fixture
async def client_for(aiohttp_client, settings, pool):
    async def make(name: str, **changes):
        changes.setdefault("resend_webhook_secret", WEBHOOK_SECRET)
        app = create_service_app(name, settings.replace(**changes))
        return app, await aiohttp_client(app)

    return make

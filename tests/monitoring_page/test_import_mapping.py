"""The monitoring page shows each import's column mapping, read from the imports row."""

from __future__ import annotations

import json

from exporter.monitoring_page.imports import mapping_summary
from exporter.monitoring_page.routes import API
from tests.monitoring_page.conftest import login


def test_mapping_summary_lists_fields_then_attributes_and_ignored():
    mapping = [{"column": "E-mail", "field": "email"}, {"column": "Nome", "field": "first_name"},
               {"column": "WhatsApp", "field": "attribute"}, {"column": "Obs", "field": "ignore"}]
    assert mapping_summary(mapping) == "E-mail → email, Nome → first_name (+1 in attributes, 1 ignored)"
    assert mapping_summary(None) is None


async def test_page_api_returns_the_mapping_of_each_import(page_client, make_key, pool):
    await login(page_client, await make_key("read"))
    mapping = [{"column": "Email Address", "field": "email"}, {"column": "TAGS", "field": "tags"},
               {"column": "LEID", "field": "attribute"}]
    await pool.execute(
        """INSERT INTO imports (status, filename, total_rows, processed_rows, inserted, mapping, started_at,
                                finished_at)
           VALUES ('completed', 'mc.csv', 3, 3, 3, $1::jsonb, now() - interval '2 seconds', now()),
                  ('queued', 'waiting.csv', NULL, 0, 0, NULL, NULL, NULL)""", json.dumps(mapping))
    body = await (await page_client.get(f"{API}/imports")).json()
    [done] = body["recent"]
    assert done["mapping"] == mapping
    assert done["mapping_summary"] == "Email Address → email, TAGS → tags (+1 in attributes)"
    [queued] = body["active"]
    assert queued["mapping"] is None and queued["mapping_summary"] is None

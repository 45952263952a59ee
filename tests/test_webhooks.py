"""Webhook URL rules, signatures and the SDK's verifier, without a running service (the end-to-end deliveries
are in tests/integration/test_webhooks.py)."""

import hashlib
import hmac
import json
from datetime import timedelta

import pytest

from app.client import WebhookVerificationError, verify_webhook
from app.models import WebhookSecret, utcnow
from app.settings import Settings
from app.webhooks import UnsafeWebhookTarget, check_webhook_url, resolve_target, sign, signing_secrets
from worker.webhooks import backoff_s

STRICT = Settings(_env_file=None)
LOCAL_DEV = Settings(_env_file=None, webhook_allow_private=True, webhook_http_hosts="127.0.0.1, localhost")


@pytest.mark.parametrize(("url", "says"), [
    ("http://hooks.example.com/x", "must use https"),
    ("ftp://hooks.example.com/x", "absolute https"),
    ("hooks.example.com/x", "absolute https"),
    ("https:///nohost", "absolute https"),
    ("https://user:pw@hooks.example.com/x", "credentials"),
    ("https://token@hooks.example.com/x", "credentials"),
    ("https://hooks.example.com/x#frag", "fragment"),
    ("https://hooks.example.com:99999/x", "port"),
    ("https://hooks.example.com/a b", "spaces"),
    ("https://127.0.0.1/x", "loopback"),
    ("https://localhost/x", "loopback"),
    ("https://api.localhost/x", "loopback"),
    ("https://10.1.2.3/x", "private"),
    ("https://192.168.0.10/x", "private"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://[::1]/x", "loopback"),
    ("https://[::ffff:10.0.0.1]/x", "private"),
    ("https://[fe80::1]/x", "link-local"),
    ("https://0.0.0.0/x", "unspecified"),
    ("https://100.64.0.1/x", "non-public"),
    ("https://hooks.example.com/" + "a" * 2100, "at most"),
])  # fmt: skip
def test_refused_urls_say_why(url, says):
    with pytest.raises(ValueError, match=says):
        check_webhook_url(url, STRICT)


def test_public_https_urls_pass_unchanged():
    for url in ("https://hooks.example.com/distill?tenant=7", "https://93.184.216.34:8443/x", "https://[2606:4700::1]/"):
        assert check_webhook_url(url, STRICT) == url


def test_local_development_settings_allow_http_to_listed_hosts_and_private_targets():
    assert check_webhook_url("http://127.0.0.1:8123/hook", LOCAL_DEV)
    assert check_webhook_url("https://10.0.0.5/hook", LOCAL_DEV)
    with pytest.raises(ValueError, match="must use https"):
        check_webhook_url("http://10.0.0.5/hook", LOCAL_DEV)  # private is allowed, plain http only to listed hosts
    with pytest.raises(ValueError, match="credentials"):
        check_webhook_url("http://u:p@127.0.0.1/hook", LOCAL_DEV)


def test_a_name_that_resolves_to_a_private_address_is_refused_at_send_time():
    with pytest.raises(UnsafeWebhookTarget, match="loopback"):
        resolve_target("localhost", 443, STRICT)
    assert resolve_target("localhost", 443, LOCAL_DEV) in ("127.0.0.1", "::1")


def test_signature_is_hmac_sha256_of_timestamp_dot_body_and_the_sdk_verifies_it():
    body = json.dumps({"id": "evt_1", "type": "job.succeeded"}, separators=(",", ":")).encode()
    header = sign(body, ["whsec_new"], 1_800_000_000)
    expected = hmac.new(b"whsec_new", b"1800000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1800000000,v1={expected}"
    assert verify_webhook(body, header, "whsec_new", now=1_800_000_100)["type"] == "job.succeeded"
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify_webhook(body, header, "whsec_other", now=1_800_000_100)
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify_webhook(body + b" ", header, "whsec_new", now=1_800_000_100)  # one byte changed
    with pytest.raises(WebhookVerificationError, match="from now"):
        verify_webhook(body, header, "whsec_new", now=1_800_000_000 + 301)  # a replay of an old request
    with pytest.raises(WebhookVerificationError, match="timestamp"):
        verify_webhook(body, "v1=" + expected, "whsec_new")


def test_after_a_rotation_both_secrets_sign_until_the_grace_period_ends():
    now = utcnow()
    row = WebhookSecret(tenant_id="t", secret="whsec_new", previous_secret="whsec_old",
                        previous_expires_at=now + timedelta(hours=1))  # fmt: skip
    keys = signing_secrets(row, now)
    assert keys == ["whsec_new", "whsec_old"]
    header = sign(b"{}", keys, 1_800_000_000)
    for secret in keys:  # a receiver still on the old secret keeps verifying
        verify_webhook(b"{}", header, secret, now=1_800_000_000)
    assert signing_secrets(row, now + timedelta(hours=2)) == ["whsec_new"]
    assert signing_secrets(None, now) == []


def test_backoff_doubles_up_to_the_ceiling(monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("WEBHOOK_RETRY_BASE_S", "10")
    monkeypatch.setenv("WEBHOOK_RETRY_MAX_S", "60")
    get_settings.cache_clear()
    try:
        assert [backoff_s(n) for n in range(1, 6)] == [10, 20, 40, 60, 60]
    finally:
        get_settings.cache_clear()

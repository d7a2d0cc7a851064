"""The one set of secret shapes: connection URLs shown with their passwords masked, in the user
part and in the query string."""

from __future__ import annotations

from localroute.redaction import mask_url, redact


def test_mask_url_masks_user_and_query_string_passwords() -> None:
    url = "postgresql://lr:s3cret@db:5432/lr?sslmode=require&password=hunter2&sslpassword=keypw#frag"
    shown = mask_url(url)
    assert "s3cret" not in shown and "hunter2" not in shown and "keypw" not in shown
    assert shown == (
        "postgresql://lr:**********@db:5432/lr?sslmode=require&password=**********&sslpassword=**********#frag"
    )
    assert mask_url("postgresql://db/lr?PASSWORD=x&application_name=lr") == (
        "postgresql://db/lr?PASSWORD=**********&application_name=lr"
    )
    assert mask_url("postgresql://lr@db/lr") == "postgresql://lr@db/lr"  # nothing secret: unchanged
    assert mask_url("/var/lib/x.db") == "/var/lib/x.db"


def test_redact_masks_an_sslpassword() -> None:
    assert "keypw" not in redact("connect failed: sslpassword=keypw host=db")

"""Security and tenancy (issue #7): API keys and scopes, rate limits and quotas, HTTP hardening
and secret redaction. The SSRF guard for user-supplied URLs is `serving.netguard`."""

-- A subscription's client certificate for mutual TLS to its receiver: the PEM chain and
-- its private key (plain text until sealing at rest lands; see docs/SECURITY.md). At most
-- one per subscription; it goes with the subscription.
CREATE TABLE subscription_client_certs (
    subscription_id  TEXT NOT NULL,
    certificate_pem  TEXT NOT NULL,
    private_key_pem  TEXT NOT NULL,
    CONSTRAINT subscription_client_certs_pkey PRIMARY KEY (subscription_id),
    CONSTRAINT subscription_client_certs_subscription_fkey FOREIGN KEY (subscription_id)
        REFERENCES subscriptions (id) ON DELETE CASCADE
) STRICT;

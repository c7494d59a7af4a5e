-- Attempts refused by the egress policy (no connection made) have their own error class.
-- NOT VALID then VALIDATE: the check of existing rows does not block writers.
ALTER TABLE attempts DROP CONSTRAINT attempts_error_class_check;
ALTER TABLE attempts ADD CONSTRAINT attempts_error_class_check CHECK (error_class IS NULL OR error_class IN
    ('timeout', 'connect', 'dns', 'tls', 'body', 'status', 'invalid', 'egress')) NOT VALID;
ALTER TABLE attempts VALIDATE CONSTRAINT attempts_error_class_check;

"""HTTP edge: routes, wire schemas, dependencies and the error-to-HTTP mapping. No SQL here."""

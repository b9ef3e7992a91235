"""Services: the business rules between the API and the store (Prefect's schema → service →
route layering)."""

"""Engine integrations (each needs its engine; none is imported by ``import kvxferd``)."""

//! CloudEvents and trace context across the bus.

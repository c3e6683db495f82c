//! Host networking: TAP devices (and, with the networking issue, segments, bridges and filters).

pub mod tap;

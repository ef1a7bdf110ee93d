//! The bufio cache partition (in progress).

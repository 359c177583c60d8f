//! hostmem-jail: placeholder, being written.

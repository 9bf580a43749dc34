//! The gateway's own connection cap (`MAX_CONNECTIONS`). Memory and descriptors bound
//! what one pod can hold; past the cap a new upgrade gets 503 and `/readyz` reports the
//! gateway full, so the load balancer sends new clients to another pod. Connections
//! already open are never touched.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Handle to the cap; cheap to clone.
#[derive(Clone, Debug)]
pub struct Capacity {
    /// `None`: no cap.
    slots: Option<Arc<Semaphore>>,
}

/// One connection's place under the cap, given back when dropped (the connection ended,
/// or its upgrade never completed).
#[derive(Debug)]
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Capacity {
    /// At most `max` connections at once; 0 means no cap.
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        Self { slots: (max > 0).then(|| Arc::new(Semaphore::new(max))) }
    }

    /// A place for one more connection; `None` when the gateway is full.
    pub fn admit(&self) -> Option<Slot> {
        match &self.slots {
            None => Some(Slot { _permit: None }),
            Some(slots) => slots.clone().try_acquire_owned().ok().map(|permit| Slot { _permit: Some(permit) }),
        }
    }

    /// Whether a new connection would be refused now.
    pub fn is_full(&self) -> bool {
        self.slots.as_ref().is_some_and(|slots| slots.available_permits() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_gateway_admits_again_once_a_connection_ends() {
        let capacity = Capacity::new(2);
        let first = capacity.admit().expect("room for one");
        let _second = capacity.admit().expect("room for two");
        assert!(capacity.is_full());
        assert!(capacity.admit().is_none(), "past the cap");
        drop(first);
        assert!(!capacity.is_full());
        assert!(capacity.admit().is_some());
    }

    #[test]
    fn no_cap_is_never_full() {
        let capacity = Capacity::new(0);
        let held: Vec<Slot> = (0..1000).filter_map(|_| capacity.admit()).collect();
        assert_eq!(held.len(), 1000);
        assert!(!capacity.is_full());
    }
}

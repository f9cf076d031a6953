//! Noticing that the TUN device has gone while the tunnel serves it.
//!
//! Deleting the interface (`ip link del tun0`, `ip tuntap del`) or moving it to
//! another network namespace detaches our descriptor, but the descriptor does not
//! say so: it is woken once before the detach shows and never becomes ready again,
//! so the stack would wait for packets forever on a device that no longer exists
//! (a silent, wedged tunnel). The platform's link watch reports the removal; the
//! tunnel then stops with an error, which a service manager can act on.
//!
//! Stage: beside the data path, never on it. The watch is an rtnetlink subscription
//! that is readable only when some link of the namespace changes, so an idle tunnel
//! never wakes for it. This module must not touch the device's descriptor.

use std::future::pending;

use tun2socks_platform::LinkWatch;

/// A device's removal watch, opened with the device (in its network namespace).
#[derive(Debug)]
pub struct Removal {
    watch: Option<LinkWatch>,
    name: String,
}

impl Removal {
    /// Watches interface `ifindex` (named `name`) in the calling thread's network
    /// namespace. If the watch cannot be opened the device is served unwatched, with a
    /// warning: that costs only the clean stop on removal, never the tunnel.
    pub(super) fn open(ifindex: u32, name: &str) -> Removal {
        let watch = match LinkWatch::new(ifindex) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(device = name, %error, "cannot watch the device for removal; a deleted device will not stop the tunnel");
                None
            }
        };
        Removal {
            watch,
            name: name.to_owned(),
        }
    }

    /// No watch (a device served in another network namespace, or in tests).
    pub fn none(name: &str) -> Removal {
        Removal {
            watch: None,
            name: name.to_owned(),
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Resolves once the device has been deleted or moved out of the namespace;
    /// never, without a watch or if the watch fails (logged once). Must run inside
    /// a tokio runtime with I/O enabled.
    pub async fn gone(mut self) {
        let Some(watch) = self.watch.take() else {
            return pending().await;
        };
        let mut watch = match watch.into_async_fd() {
            Ok(watch) => watch,
            Err(error) => return self.unwatched(&error).await,
        };
        // The device may have gone between opening it and now.
        let mut checked = watch.get_mut().gone();
        loop {
            match checked {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => return self.unwatched(&error).await,
            }
            let mut ready = match watch.readable_mut().await {
                Ok(ready) => ready,
                Err(error) => return self.unwatched(&error).await,
            };
            checked = ready.get_inner_mut().gone();
            ready.clear_ready();
        }
    }

    async fn unwatched(&self, error: &std::io::Error) {
        tracing::warn!(device = %self.name, %error, "watching the device for removal failed; a deleted device will not stop the tunnel");
        pending().await
    }
}

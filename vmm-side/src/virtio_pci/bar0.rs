//! BAR0 of the GPU function: the common configuration (feature negotiation, status, queue
//! registers), the ISR, the device configuration (`struct virtio_gpu_config`) and the
//! notify region (kicks the ioeventfd missed).

use super::{
    status, VirtioPciGpu, BAR0_SIZE, COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_LEN,
    DEVICE_CFG_OFFSET, ISR_CONFIG, ISR_OFFSET, ISR_QUEUE, MAX_QUEUE_SIZE, NOTIFY_OFF_MULTIPLIER,
    NO_VECTOR, NUM_QUEUES, OFFERED_FEATURES, PCI_COMMAND_MEMORY, VIRTIO_F_VERSION_1,
};

/// Fields of the common configuration, by offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Common {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    MsixConfig,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc,
    QueueDriver,
    QueueDevice,
    QueueNotifyData,
    QueueReset,
}

/// `(offset, length, field)` of every common configuration field.
const COMMON_FIELDS: [(u64, usize, Common); 18] = [
    (0x00, 4, Common::DeviceFeatureSelect),
    (0x04, 4, Common::DeviceFeature),
    (0x08, 4, Common::DriverFeatureSelect),
    (0x0c, 4, Common::DriverFeature),
    (0x10, 2, Common::MsixConfig),
    (0x12, 2, Common::NumQueues),
    (0x14, 1, Common::DeviceStatus),
    (0x15, 1, Common::ConfigGeneration),
    (0x16, 2, Common::QueueSelect),
    (0x18, 2, Common::QueueSize),
    (0x1a, 2, Common::QueueMsixVector),
    (0x1c, 2, Common::QueueEnable),
    (0x1e, 2, Common::QueueNotifyOff),
    (0x20, 8, Common::QueueDesc),
    (0x28, 8, Common::QueueDriver),
    (0x30, 8, Common::QueueDevice),
    (0x38, 2, Common::QueueNotifyData),
    (0x3a, 2, Common::QueueReset),
];

impl VirtioPciGpu {
    /// BAR0 offset of an access, if it starts inside BAR0.
    fn bar0_offset(&self, gpa: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.layout.bar0_gpa)?;
        (off < BAR0_SIZE).then_some(off)
    }

    /// MMIO exits inside BAR0. Returns false if the address is not ours.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) -> bool {
        let Some(off) = self.bar0_offset(gpa) else {
            return false;
        };
        data.fill(0xff);
        let Some((region, within)) = self.mmio_access(off, data.len()) else {
            return true;
        };
        match region {
            COMMON_CFG_OFFSET => copy_from_image(&self.common_image(), within, data),
            ISR_OFFSET => {
                data.fill(0);
                if within == 0 {
                    if let Some(b) = data.first_mut() {
                        *b = self.isr_read();
                    }
                }
            }
            DEVICE_CFG_OFFSET => copy_from_image(&self.device_cfg_image(), within, data),
            _ => data.fill(0), // notify: write-only
        }
        true
    }

    /// MMIO writes inside BAR0. Returns false if the address is not ours.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(off) = self.bar0_offset(gpa) else {
            return false;
        };
        let Some((region, within)) = self.mmio_access(off, data.len()) else {
            return true;
        };
        match region {
            COMMON_CFG_OFFSET => self.common_write(within, data),
            ISR_OFFSET => log::debug!("virtio-pci: write to the read-only ISR ignored"),
            DEVICE_CFG_OFFSET => self.device_cfg_write(within, data),
            _ => self.notify_exit(within),
        }
        true
    }

    /// A notify write that reached the VMM (the ioeventfd should have taken it, so this is
    /// a KVM that does not match it): signal the queue's kick eventfd ourselves, so the
    /// device still sees the kick. Counted in [`VirtioPciGpu::notify_exits`].
    fn notify_exit(&mut self, within: u64) {
        self.notify_exits += 1;
        let queue = within / u64::from(NOTIFY_OFF_MULTIPLIER);
        match self.kick_eventfd(queue as u16) {
            Some(k) if within.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) => {
                if self.notify_exits == 1 {
                    log::warn!(
                        "virtio-pci: a notify write reached the VMM (no ioeventfd match); \
                         kicking queue {queue} by hand"
                    );
                }
                if let Err(e) = k.write(1) {
                    self.warnings.warn(
                        "kick failed",
                        format_args!("virtio-pci: kicking queue {queue}: {e}"),
                    );
                }
            }
            _ => log::debug!("virtio-pci: notify write at notify+{within:#x} ignored"),
        }
    }

    /// Notify writes that exited to the VMM instead of hitting the ioeventfd.
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits
    }

    /// `(region base, offset in region)` of an access the BAR decodes: memory decoding on,
    /// 1..=8 bytes, inside one 4 KiB region.
    fn mmio_access(&self, off: u64, len: usize) -> Option<(u64, u64)> {
        if self.command & PCI_COMMAND_MEMORY == 0 {
            log::debug!("virtio-pci: BAR0 access with memory decoding off ignored");
            return None;
        }
        let within = off % 0x1000;
        if len == 0 || len > 8 || within + len as u64 > 0x1000 {
            log::debug!("virtio-pci: {len}-byte access at BAR0+{off:#x} ignored");
            return None;
        }
        Some((off - within, within))
    }

    fn isr_read(&mut self) -> u8 {
        let mut isr = 0;
        if self.v.status & status::DRIVER_OK != 0 {
            isr |= ISR_QUEUE;
        }
        if std::mem::take(&mut self.v.isr_config) {
            isr |= ISR_CONFIG;
        }
        isr
    }

    fn common_value(&self, field: Common) -> u64 {
        let q = self.selected();
        let features = |select: u32, bits: u64| match select {
            0 => bits & 0xffff_ffff,
            1 => bits >> 32,
            _ => 0,
        };
        match field {
            Common::DeviceFeatureSelect => u64::from(self.v.device_feature_select),
            Common::DeviceFeature => features(self.v.device_feature_select, OFFERED_FEATURES),
            Common::DriverFeatureSelect => u64::from(self.v.driver_feature_select),
            Common::DriverFeature => features(self.v.driver_feature_select, self.v.driver_features),
            Common::MsixConfig | Common::QueueMsixVector => u64::from(NO_VECTOR),
            Common::NumQueues => u64::from(NUM_QUEUES),
            Common::DeviceStatus => u64::from(self.device_status()),
            Common::ConfigGeneration => u64::from(self.config_generation),
            Common::QueueSelect => u64::from(self.v.queue_select),
            Common::QueueSize => q.map_or(0, |q| u64::from(q.size)),
            Common::QueueEnable => q.map_or(0, |q| u64::from(q.enabled)),
            Common::QueueNotifyOff => {
                if q.is_some() {
                    u64::from(self.v.queue_select)
                } else {
                    0
                }
            }
            Common::QueueDesc => q.map_or(0, |q| q.desc),
            Common::QueueDriver => q.map_or(0, |q| q.driver),
            Common::QueueDevice => q.map_or(0, |q| q.device),
            Common::QueueNotifyData | Common::QueueReset => 0,
        }
    }

    fn common_image(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut image = [0u8; COMMON_CFG_LEN as usize];
        for (offset, len, field) in COMMON_FIELDS {
            let bytes = self.common_value(field).to_le_bytes();
            let at = offset as usize;
            if let (Some(dst), Some(src)) = (image.get_mut(at..at + len), bytes.get(..len)) {
                dst.copy_from_slice(src);
            }
        }
        image
    }

    fn common_write(&mut self, within: u64, data: &[u8]) {
        let end = within + data.len() as u64;
        let Some(&(start, len, field)) = COMMON_FIELDS
            .iter()
            .find(|(s, l, _)| *s <= within && end <= s + *l as u64)
        else {
            self.warnings.warn("bad common cfg write", format_args!("virtio-pci: {}-byte common cfg write at {within:#x} does not fit one field; ignored",
                data.len()));
            return;
        };
        // Merge the written bytes into the field's current value (a 32-bit half of a 64-bit
        // address, a byte of a 16-bit field).
        let mut bytes = self.common_value(field).to_le_bytes();
        let at = (within - start) as usize;
        if let Some(dst) = bytes.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
        let value = u64::from_le_bytes(bytes) & (u64::MAX >> (64 - 8 * len as u32));
        self.common_set(field, value);
    }

    fn common_set(&mut self, field: Common, value: u64) {
        let sel = self.v.queue_select;
        match field {
            Common::DeviceFeatureSelect => self.v.device_feature_select = value as u32,
            Common::DriverFeatureSelect => self.v.driver_feature_select = value as u32,
            Common::DriverFeature => self.write_driver_features(value as u32),
            Common::DeviceStatus => self.write_status(value as u8),
            Common::QueueSelect => self.v.queue_select = value as u16,
            Common::QueueSize => self.write_queue_size(value as u16),
            Common::QueueEnable => match value {
                1 => self.enable_queue(sel),
                _ => {
                    self.warnings.warn(
                        "bad queue_enable",
                        format_args!("virtio-pci: queue_enable {value} on queue {sel} ignored"),
                    );
                }
            },
            Common::QueueDesc | Common::QueueDriver | Common::QueueDevice => {
                let Some(q) = self.v.queues.get_mut(usize::from(sel)) else {
                    self.warnings.warn(
                        "missing queue",
                        format_args!("virtio-pci: ring address for missing queue {sel} ignored"),
                    );
                    return;
                };
                if q.enabled {
                    self.warnings.warn(
                        "write to an enabled queue",
                        format_args!("virtio-pci: ring address of enabled queue {sel} ignored"),
                    );
                    return;
                }
                match field {
                    Common::QueueDesc => q.desc = value,
                    Common::QueueDriver => q.driver = value,
                    _ => q.device = value,
                }
            }
            Common::MsixConfig | Common::QueueMsixVector => {
                // No MSI-X: the register keeps reading NO_VECTOR, which tells the driver.
                log::debug!("virtio-pci: MSI-X vector {value:#x} ignored (no MSI-X)");
            }
            Common::QueueReset => {
                log::debug!("virtio-pci: queue_reset ignored (VIRTIO_F_RING_RESET not offered)")
            }
            Common::DeviceFeature
            | Common::NumQueues
            | Common::ConfigGeneration
            | Common::QueueNotifyOff
            | Common::QueueNotifyData => {
                self.warnings.warn(
                    "write to a read-only field",
                    format_args!("virtio-pci: write to read-only {field:?} ignored"),
                );
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.v.status & status::FEATURES_OK != 0 {
            self.warnings.warn(
                "bad driver features",
                format_args!("virtio-pci: driver features written after FEATURES_OK; ignored"),
            );
            return;
        }
        let f = &mut self.v.driver_features;
        match self.v.driver_feature_select {
            0 => *f = (*f & !0xffff_ffff) | u64::from(value),
            1 => *f = (*f & 0xffff_ffff) | (u64::from(value) << 32),
            sel if value != 0 => {
                self.warnings.warn(
                    "bad driver features",
                    format_args!(
                    "virtio-pci: driver features {value:#x} in word {sel} ignored (none offered)"
                ),
                );
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.v.status;
        // DEVICE_NEEDS_RESET is the device's bit: a driver writing back what it read may
        // include it.
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        if old & !new != 0 {
            self.warnings.warn("bad status write", format_args!("virtio-pci: status {value:#x} clears bits of {old:#x} (only a reset may); ignored"));
            return;
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let f = self.v.driver_features;
            if f & !OFFERED_FEATURES != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                self.warnings.warn("FEATURES_OK refused", format_args!("virtio-pci: FEATURES_OK refused: driver features {f:#x} (offered {OFFERED_FEATURES:#x}, VERSION_1 required)"));
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            self.warnings.warn(
                "FEATURES_OK refused",
                format_args!("virtio-pci: DRIVER_OK without FEATURES_OK refused"),
            );
            new &= !status::DRIVER_OK;
        }
        self.v.status = new;
    }

    fn write_queue_size(&mut self, size: u16) {
        let sel = self.v.queue_select;
        let Some(q) = self.v.queues.get_mut(usize::from(sel)) else {
            self.warnings.warn(
                "missing queue",
                format_args!("virtio-pci: queue_size for missing queue {sel} ignored"),
            );
            return;
        };
        if q.enabled {
            self.warnings.warn(
                "write to an enabled queue",
                format_args!("virtio-pci: queue_size of enabled queue {sel} ignored"),
            );
        } else if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            self.warnings.warn("bad queue_size", format_args!("virtio-pci: queue_size {size} for queue {sel} refused (power of two <= {MAX_QUEUE_SIZE})"));
        } else {
            q.size = size;
        }
    }

    fn device_cfg_image(&self) -> [u8; DEVICE_CFG_LEN as usize] {
        let mut image = [0u8; DEVICE_CFG_LEN as usize];
        // events_read, events_clear (reads 0), num_scanouts (the device's, from its
        // `Ready`), num_capsets.
        image[0..4].copy_from_slice(&self.v.events_read.to_le_bytes());
        image[8..12].copy_from_slice(&self.num_scanouts.to_le_bytes());
        image[12..16].copy_from_slice(&self.num_capsets.to_le_bytes());
        image
    }

    fn device_cfg_write(&mut self, within: u64, data: &[u8]) {
        // Only events_clear (offset 4) is writable: write 1 to clear.
        let end = within + data.len() as u64;
        if within < 4 || end > 8 {
            // debug: the guest can write here as often as it likes.
            log::debug!("virtio-pci: write to read-only device cfg at {within:#x} ignored");
            return;
        }
        let mut clear = [0u8; 4];
        let at = (within - 4) as usize;
        if let Some(dst) = clear.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
        self.v.events_read &= !u32::from_le_bytes(clear);
    }
}

fn copy_from_image(image: &[u8], within: u64, data: &mut [u8]) {
    data.fill(0);
    let at = within as usize;
    for (i, b) in data.iter_mut().enumerate() {
        if let Some(v) = image.get(at + i) {
            *b = *v;
        }
    }
}

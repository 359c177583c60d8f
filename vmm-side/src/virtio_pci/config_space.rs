//! PCI configuration space of the GPU function: configuration mechanism #1 on ports
//! 0xCF8/0xCFC, the header (ids, command, BARs that cannot move), and the virtio
//! capabilities (common, ISR, device, notify, shared memory).

use super::{
    VirtioPciGpu, BAR0_SIZE, BAR_MEM64, BAR_PREFETCH, CAP_START, CAP_VENDOR, CLASS, COMMON_CFG_LEN,
    COMMON_CFG_OFFSET, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, DEVICE_CFG_LEN, DEVICE_CFG_OFFSET,
    DEVICE_ID, ISR_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, NUM_QUEUES, PCI_DEVICE,
    PCI_STATUS_CAP_LIST, REVISION, SHM_ID_HOST_VISIBLE, SUBCLASS, SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};

/// A virtio PCI capability: cfg_type, bar, id, offset, length, extra dwords.
type CapSpec<'a> = (u8, u8, u8, u64, u64, &'a [u32]);

impl VirtioPciGpu {
    /// Port I/O exits: 0xCF8..=0xCFF. Returns false if the port is not ours.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        if !(CONFIG_ADDRESS_PORT..=CONFIG_DATA_PORT + 3).contains(&port) {
            return false;
        }
        data.fill(0xff);
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
        } else if port >= CONFIG_DATA_PORT {
            let off = usize::from(port - CONFIG_DATA_PORT);
            if let Some(reg) = self.selected_register(off, data.len()) {
                let dword = self.config_read(reg).to_le_bytes();
                if let Some(src) = dword.get(off..off + data.len()) {
                    data.copy_from_slice(src);
                }
            }
        }
        true
    }

    /// Port I/O writes: 0xCF8..=0xCFF. Returns false if the port is not ours.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        if !(CONFIG_ADDRESS_PORT..=CONFIG_DATA_PORT + 3).contains(&port) {
            return false;
        }
        if port == CONFIG_ADDRESS_PORT {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.config_address = u32::from_le_bytes(bytes);
            } else {
                log::debug!("virtio-pci: {}-byte write to 0xcf8 ignored", data.len());
            }
        } else if port >= CONFIG_DATA_PORT {
            let off = usize::from(port - CONFIG_DATA_PORT);
            if let Some(reg) = self.selected_register(off, data.len()) {
                self.config_write(reg, off, data);
            }
        } else {
            log::debug!("virtio-pci: write to port {port:#x} ignored");
        }
        true
    }

    /// The config register (dword-aligned offset) of our function that 0xCF8 selects, if
    /// the access of `len` bytes at data port offset `off` fits the dword.
    fn selected_register(&self, off: usize, len: usize) -> Option<u8> {
        if len == 0 || off.checked_add(len)? > 4 {
            return None;
        }
        let a = self.config_address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let device = (a >> 11) & 0x1f;
        let function = (a >> 8) & 0x7;
        if !enabled || bus != 0 || device != u32::from(PCI_DEVICE) || function != 0 {
            return None;
        }
        Some((a & 0xfc) as u8)
    }

    fn bar_flags(&self, pair: usize) -> Option<(u64, u64, u32)> {
        match pair {
            0 => Some((self.layout.bar0_gpa, BAR0_SIZE, BAR_MEM64)),
            1 => Some((
                self.layout.window_gpa,
                self.bar2_size,
                BAR_MEM64 | BAR_PREFETCH,
            )),
            _ => None,
        }
    }

    /// BAR register `index`: its address, or its size mask while `sizing`.
    fn bar_value(&self, index: usize, sizing: bool) -> u32 {
        let Some((addr, size, flags)) = self.bar_flags(index / 2) else {
            return 0; // BAR4/BAR5 are not implemented: they size to 0.
        };
        let value = if sizing { !(size - 1) } else { addr };
        if index.is_multiple_of(2) {
            (value as u32 & !0xf) | flags
        } else {
            (value >> 32) as u32
        }
    }

    fn bar_read(&self, index: usize) -> u32 {
        let sizing = self.bar_sizing.get(index).copied().unwrap_or(false);
        self.bar_value(index, sizing)
    }

    /// One dword of our config space.
    fn config_read(&self, reg: u8) -> u32 {
        let le16 = |lo: u16, hi: u16| u32::from(lo) | (u32::from(hi) << 16);
        match reg {
            0x00 => le16(VENDOR_ID, DEVICE_ID),
            0x04 => le16(self.command, PCI_STATUS_CAP_LIST),
            0x08 => u32::from_le_bytes([REVISION, 0, SUBCLASS, CLASS]),
            0x0c => 0, // header type 0, single function
            0x10..=0x27 => self.bar_read(usize::from((reg - 0x10) / 4)),
            0x2c => le16(SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID),
            0x34 => CAP_START as u32,
            0x3c => u32::from_le_bytes([self.interrupt_line, 1, 0, 0]),
            _ => {
                let caps = self.capabilities();
                let at = usize::from(reg).wrapping_sub(CAP_START);
                match caps.get(at..at.saturating_add(4)) {
                    Some(b) if usize::from(reg) >= CAP_START => {
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    }
                    _ => 0,
                }
            }
        }
    }

    fn config_write(&mut self, reg: u8, off: usize, data: &[u8]) {
        let mut bytes = self.config_read(reg).to_le_bytes();
        if let Some(dst) = bytes.get_mut(off..off + data.len()) {
            dst.copy_from_slice(data);
        }
        let value = u32::from_le_bytes(bytes);
        match reg {
            0x04 => {
                // The status half is RW1C and has nothing to clear.
                self.command = value as u16;
            }
            0x10..=0x27 => {
                let index = usize::from((reg - 0x10) / 4);
                let sizing = value == u32::MAX;
                if let Some(s) = self.bar_sizing.get_mut(index) {
                    *s = sizing;
                }
                if !sizing && value & !0xf != self.bar_value(index, false) & !0xf {
                    log::debug!("virtio-pci: BAR{index} write {value:#x} ignored (BARs are fixed)");
                }
            }
            0x3c => self.interrupt_line = value as u8,
            _ => log::debug!("virtio-pci: config write {value:#x} at {reg:#x} ignored"),
        }
    }

    /// The capability list, from config offset [`CAP_START`] on.
    fn capabilities(&self) -> Vec<u8> {
        let mut caps = Vec::with_capacity(0x60);
        // (cfg_type, bar, id, offset, length, extra dwords)
        let list: [CapSpec<'_>; 5] = [
            (1, 0, 0, COMMON_CFG_OFFSET, u64::from(COMMON_CFG_LEN), &[]),
            (
                2,
                0,
                0,
                NOTIFY_OFFSET,
                u64::from(NUM_QUEUES) * u64::from(NOTIFY_OFF_MULTIPLIER),
                &[NOTIFY_OFF_MULTIPLIER],
            ),
            (3, 0, 0, ISR_OFFSET, 1, &[]),
            (4, 0, 0, DEVICE_CFG_OFFSET, u64::from(DEVICE_CFG_LEN), &[]),
            (
                8,
                2,
                SHM_ID_HOST_VISIBLE,
                0,
                self.layout.window_size,
                // virtio_pci_cap64: offset_hi, length_hi.
                &[0, (self.layout.window_size >> 32) as u32],
            ),
        ];
        let last = list.len() - 1;
        for (i, (cfg_type, bar, id, offset, length, extra)) in list.iter().enumerate() {
            let len = 16 + 4 * extra.len();
            let next = if i == last {
                0
            } else {
                CAP_START + caps.len() + len
            };
            caps.extend_from_slice(&[
                CAP_VENDOR, next as u8, len as u8, *cfg_type, *bar, *id, 0, 0,
            ]);
            caps.extend_from_slice(&(*offset as u32).to_le_bytes());
            caps.extend_from_slice(&(*length as u32).to_le_bytes());
            for d in *extra {
                caps.extend_from_slice(&d.to_le_bytes());
            }
        }
        caps
    }
}

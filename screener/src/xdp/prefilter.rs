//! The userspace half of the prefilters: which bits to set for an entry,
//! and a count per bit so a bit is cleared only when the last entry that
//! needed it goes.
//!
//! A set bit only means "maybe blocked"; a clear bit tells the program no
//! entry covers the source. So a bit is always set before its entry goes
//! into the kernel and cleared only after the last such entry left. An
//! entry too wide to index (an IPv4 CIDR shorter than /12, an IPv6 prefix
//! shorter than /32) switches the family's prefilter off while it exists.
//! Two entries may share a bit (hashing, or one /24 for many hosts): the
//! count per bit keeps that right.

use std::collections::HashMap;

use aya::maps::{Array, MapData};
use ipnet::IpNet;
use screener_common::prefilter::{self, v4_index, v6_index, V4_MIN_PREFIX, V6_MIN_PREFIX};

use super::XdpError;

/// One family's prefilter.
pub struct Prefilter {
    map: Array<MapData, u64>,
    name: &'static str,
    /// Mirror of the kernel words, so a change writes one word.
    words: Vec<u64>,
    /// Entries needing each set bit.
    counts: HashMap<u32, u32>,
    /// Entries too wide to index; while any exist the prefilter is off.
    wide: u32,
}

/// The bits an entry needs, or `None` when it is too wide to index.
pub fn bits_of(net: &IpNet) -> Option<Vec<u32>> {
    match net {
        IpNet::V4(n) => {
            if n.prefix_len() < V4_MIN_PREFIX {
                return None;
            }
            let first = v4_index(n.network().octets());
            let span = 1u32 << (24 - u32::from(n.prefix_len().min(24)));
            Some((first..first + span).collect())
        }
        IpNet::V6(n) => {
            if n.prefix_len() < V6_MIN_PREFIX {
                return None;
            }
            let base = u128::from(n.network());
            let span = 1u128 << (48 - u32::from(n.prefix_len().min(48)));
            Some(
                (0..span)
                    .map(|i| v6_index((base + (i << 80)).to_be_bytes()))
                    .collect(),
            )
        }
    }
}

impl Prefilter {
    pub fn new(map: Array<MapData, u64>, name: &'static str) -> Prefilter {
        Prefilter {
            map,
            name,
            words: Vec::new(),
            counts: HashMap::new(),
            wide: 0,
        }
    }

    /// Whether the program may trust this prefilter.
    pub fn authoritative(&self) -> bool {
        self.wide == 0 && self.is_built()
    }

    /// Whether `rebuild` has run on this handle.
    pub fn is_built(&self) -> bool {
        !self.words.is_empty()
    }

    fn write(&mut self, word: usize) -> Result<(), XdpError> {
        let index = u32::try_from(word).expect("word index fits");
        self.map
            .set(index, self.words[word], 0)
            .map_err(|source| XdpError::Map {
                map: self.name.to_owned(),
                source,
            })
    }

    /// Recomputes every bit from `nets` (all block entries of the family)
    /// and writes the words that differ from the kernel's.
    pub fn rebuild<'a>(&mut self, nets: impl Iterator<Item = &'a IpNet>) -> Result<(), XdpError> {
        self.counts.clear();
        self.wide = 0;
        let mut words = vec![0u64; prefilter::WORDS];
        for net in nets {
            match bits_of(net) {
                None => self.wide += 1,
                Some(bits) => {
                    for b in bits {
                        *self.counts.entry(b).or_default() += 1;
                        words[(b >> 6) as usize] |= 1u64 << (b & 63);
                    }
                }
            }
        }
        let old = std::mem::replace(&mut self.words, words);
        for w in 0..prefilter::WORDS {
            let kernel = match old.get(w) {
                Some(v) => *v,
                None => self
                    .map
                    .get(&u32::try_from(w).expect("word index fits"), 0)
                    .map_err(|source| XdpError::Map {
                        map: self.name.to_owned(),
                        source,
                    })?,
            };
            if kernel != self.words[w] {
                self.write(w)?;
            }
        }
        Ok(())
    }

    /// Accounts for a new entry; sets (and writes) the bits it needs.
    pub fn add(&mut self, net: &IpNet) -> Result<(), XdpError> {
        let Some(bits) = bits_of(net) else {
            self.wide += 1;
            return Ok(());
        };
        for b in bits {
            let c = self.counts.entry(b).or_default();
            *c += 1;
            if *c == 1 {
                let w = (b >> 6) as usize;
                self.words[w] |= 1u64 << (b & 63);
                self.write(w)?;
            }
        }
        Ok(())
    }

    /// Accounts for a removed entry; clears the bits nothing else needs.
    pub fn remove(&mut self, net: &IpNet) -> Result<(), XdpError> {
        let Some(bits) = bits_of(net) else {
            self.wide = self.wide.saturating_sub(1);
            return Ok(());
        };
        for b in bits {
            let Some(c) = self.counts.get_mut(&b) else {
                continue;
            };
            *c -= 1;
            if *c == 0 {
                self.counts.remove(&b);
                let w = (b >> 6) as usize;
                self.words[w] &= !(1u64 << (b & 63));
                self.write(w)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_bits_cover_every_slash_24_of_the_entry() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(bits_of(&n("192.0.2.7/32")), Some(vec![0x00C0_0002]));
        assert_eq!(bits_of(&n("192.0.2.0/24")), Some(vec![0x00C0_0002]));
        assert_eq!(bits_of(&n("198.51.100.0/22")).unwrap().len(), 4);
        assert_eq!(bits_of(&n("10.0.0.0/12")).unwrap().len(), 4096);
        assert_eq!(bits_of(&n("10.0.0.0/11")), None);
    }

    #[test]
    fn v6_bits_hash_each_slash_48() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let a = bits_of(&n("2001:db8:1::/48")).unwrap();
        let b = bits_of(&n("2001:db8:1:2::/64")).unwrap();
        assert_eq!(a, b, "same /48, same bit");
        assert!(a[0] < prefilter::BITS);
        assert_eq!(bits_of(&n("2001:db8::/46")).unwrap().len(), 4);
        assert!(bits_of(&n("2001:db8::/32")).unwrap().contains(&a[0]));
        assert_eq!(bits_of(&n("2001:db8::/31")), None);
    }
}

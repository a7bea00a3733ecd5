//! The weighted split of a route over its backends. Without a user key each request
//! draws by weight. With one (a sticky cookie or header) the draw is weighted
//! rendezvous hashing: each backend scores the key as `-weight / ln(u)`, `u` a hash
//! of (key, backend) in (0, 1), and the highest score wins. Each backend wins with
//! probability weight / total, one user always lands on the same backend, and a
//! weight change moves only the users it must: raising a canary from 10% to 20% moves
//! about 10% of users, all of them to the canary.

/// A stable 64-bit hash (FNV-1a, then a splitmix64 finish): the same in every proxy
/// and every build, so that two sidecars send one user to one backend.
pub fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A backend as the split sees it: its name (hashed with the user's key), its weight,
/// and whether it has an endpoint ready.
pub struct Choice<'a> {
    pub name: &'a str,
    pub weight: u32,
    pub ready: bool,
}

/// The backend for a request: with `key`, the user's; else a weighted draw. Backends
/// without a ready endpoint get nothing while another can serve; when none is ready,
/// the weights alone decide (their balancers will say what is wrong). None only when
/// every weight is 0.
pub fn pick(backends: &[Choice<'_>], key: Option<u64>) -> Option<usize> {
    let any_ready = backends.iter().any(|b| b.ready && b.weight > 0);
    let eligible = |b: &Choice<'_>| b.weight > 0 && (b.ready || !any_ready);
    match key {
        Some(key) => backends
            .iter()
            .enumerate()
            .filter(|(_, b)| eligible(b))
            .map(|(i, b)| {
                let h = hash(&[&key.to_be_bytes(), b.name.as_bytes()]);
                // u in (0, 1): 53 bits, never 0.
                let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                (i, -f64::from(b.weight) / u.ln())
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i),
        None => {
            let total: u64 = backends
                .iter()
                .filter(|b| eligible(b))
                .map(|b| u64::from(b.weight))
                .sum();
            if total == 0 {
                return None;
            }
            let mut r = fastrand::u64(0..total);
            backends.iter().position(|b| {
                if !eligible(b) {
                    return false;
                }
                let w = u64::from(b.weight);
                if r < w {
                    true
                } else {
                    r -= w;
                    false
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two(w1: u32, w2: u32) -> [Choice<'static>; 2] {
        [
            Choice {
                name: "api-v1.demo:80",
                weight: w1,
                ready: true,
            },
            Choice {
                name: "api-v2.demo:80",
                weight: w2,
                ready: true,
            },
        ]
    }

    #[test]
    fn sticky_users_follow_the_weights_and_stay_put() {
        let users = 100_000u64;
        let on_v2 = (0..users)
            .filter(|u| pick(&two(90, 10), Some(hash(&[&u.to_be_bytes()]))) == Some(1))
            .count();
        let share = on_v2 as f64 / users as f64;
        assert!((0.095..0.105).contains(&share), "{share}");
        for u in 0..100u64 {
            let k = Some(hash(&[&u.to_be_bytes()]));
            assert_eq!(pick(&two(90, 10), k), pick(&two(90, 10), k));
        }
    }

    #[test]
    fn raising_the_canary_moves_only_the_users_it_must() {
        let users = 100_000u64;
        let (mut moved, mut moved_back) = (0, 0);
        for u in 0..users {
            let k = Some(hash(&[&u.to_be_bytes()]));
            let before = pick(&two(90, 10), k);
            let after = pick(&two(80, 20), k);
            if before != after {
                moved += 1;
                if after == Some(0) {
                    moved_back += 1;
                }
            }
        }
        let share = moved as f64 / users as f64;
        assert!((0.09..0.11).contains(&share), "{share}");
        assert_eq!(moved_back, 0, "nobody leaves the canary when it grows");
    }

    #[test]
    fn a_backend_without_ready_endpoints_gets_nothing() {
        let mut b = two(50, 50);
        b[1].ready = false;
        for u in 0..1000u64 {
            assert_eq!(pick(&b, Some(u)), Some(0));
            assert_eq!(pick(&b, None), Some(0));
        }
        b[0].ready = false;
        assert!(pick(&b, None).is_some(), "none ready: the weights decide");
        assert_eq!(pick(&two(0, 0), None), None);
        assert_eq!(pick(&two(0, 5), Some(7)), Some(1), "weight 0 gets nothing");
    }

    #[test]
    fn unkeyed_draws_follow_the_weights() {
        let n = 100_000;
        let v2 = (0..n)
            .filter(|_| pick(&two(90, 10), None) == Some(1))
            .count();
        let share = v2 as f64 / n as f64;
        assert!((0.095..0.105).contains(&share), "{share}");
    }
}

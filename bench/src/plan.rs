//! Room arithmetic, exactly as loadgen.js (`lib/common.js`) does it.
//!
//! Client `i` is in rooms `(i + j) % K` for `j < J`; broadcast `s` goes to rooms
//! `s % K .. s % K + M - 1` (mod K). Membership is a pure function of the client
//! index, so expected deliveries follow from the list of joined clients.

/// The room indices client `i` joins.
pub fn rooms_of_client(i: usize, rooms: usize, per_client: usize) -> impl Iterator<Item = usize> {
    (0..per_client).map(move |j| (i + j) % rooms.max(1))
}

/// The room indices a broadcast whose first room is `r` targets.
pub fn target_rooms(r: usize, rooms: usize, broadcast_rooms: usize) -> Vec<usize> {
    (0..broadcast_rooms)
        .map(|j| (r + j) % rooms.max(1))
        .collect()
}

/// Whether client `i` (rooms `i..i+J-1` mod K) is in any of rooms `r..r+M-1` (mod K).
/// A first room outside `0..K` matches nothing.
pub fn client_in_target(
    i: usize,
    r: u64,
    rooms: usize,
    per_client: usize,
    broadcast_rooms: u64,
) -> bool {
    let k = rooms as u64;
    if k == 0 || r >= k {
        return false;
    }
    let first = i as u64 % k;
    (0..per_client as u64).any(|j| {
        let room = (first + j) % k;
        (room + k - r) % k < broadcast_rooms
    })
}

/// `union[r]`: how many of the joined clients a broadcast with first room `r` must
/// reach (each client counted once, however many of the target rooms it is in).
pub fn union_counts(
    joined: &[usize],
    rooms: usize,
    per_client: usize,
    broadcast_rooms: usize,
) -> Vec<u64> {
    (0..rooms)
        .map(|r| {
            joined
                .iter()
                .filter(|&&i| {
                    client_in_target(i, r as u64, rooms, per_client, broadcast_rooms as u64)
                })
                .count() as u64
        })
        .collect()
}

/// Deliveries broadcast `s` must make: the union of its rooms, less the sender for a
/// socket `publish` (the sender is always a member of the first room).
pub fn expected_of(union: &[u64], s: u64, via_socket: bool) -> u64 {
    if union.is_empty() {
        return 0;
    }
    let u = union[(s % union.len() as u64) as usize];
    if via_socket { u.saturating_sub(1) } else { u }
}

/// A room's name on the wire.
pub fn room_name(prefix: &str, r: usize) -> String {
    format!("{prefix}{r}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_join_consecutive_rooms() {
        assert_eq!(rooms_of_client(7, 10, 1).collect::<Vec<_>>(), vec![7]);
        assert_eq!(rooms_of_client(9, 10, 3).collect::<Vec<_>>(), vec![9, 0, 1]);
        assert_eq!(target_rooms(8, 10, 3), vec![8, 9, 0]);
    }

    #[test]
    fn single_room_union_is_room_size() {
        let joined: Vec<usize> = (0..1000).collect();
        let u = union_counts(&joined, 10, 1, 1);
        assert_eq!(u, vec![100; 10]);
        assert_eq!(expected_of(&u, 3, false), 100);
    }

    #[test]
    fn multi_room_union_counted_once() {
        // README: every client in 2 rooms, broadcasts to 3 rooms: 400 of 1000 clients
        // are in the union (and 200 of them are in two target rooms), counted once.
        let joined: Vec<usize> = (0..1000).collect();
        let u = union_counts(&joined, 10, 2, 3);
        assert_eq!(u, vec![400; 10]);
        // the same by brute force over room sets
        for (r, &got) in u.iter().enumerate() {
            let targets = target_rooms(r, 10, 3);
            let n = joined
                .iter()
                .filter(|&&i| rooms_of_client(i, 10, 2).any(|room| targets.contains(&room)))
                .count() as u64;
            assert_eq!(got, n);
        }
        let in_two = joined
            .iter()
            .filter(|&&i| {
                rooms_of_client(i, 10, 2)
                    .filter(|room| target_rooms(0, 10, 3).contains(room))
                    .count()
                    == 2
            })
            .count();
        assert_eq!(in_two, 200);
    }

    #[test]
    fn publish_excludes_the_sender() {
        let joined: Vec<usize> = (0..20).collect();
        let u = union_counts(&joined, 4, 1, 1);
        assert_eq!(u, vec![5; 4]);
        assert_eq!(expected_of(&u, 6, true), 4);
        assert_eq!(expected_of(&[0], 0, true), 0);
    }

    #[test]
    fn only_joined_clients_count() {
        let joined = vec![0, 1, 2, 10, 11];
        let u = union_counts(&joined, 10, 1, 1);
        assert_eq!(u[0], 2);
        assert_eq!(u[1], 2);
        assert_eq!(u[2], 1);
        assert_eq!(u[3], 0);
    }

    #[test]
    fn out_of_range_first_room_matches_nothing() {
        assert!(!client_in_target(3, 10, 10, 1, 1));
        assert!(!client_in_target(3, u64::MAX, 10, 1, 1));
        assert!(client_in_target(3, 3, 10, 1, 1));
        // wraps around: rooms 9, 0 cover client 0
        assert!(client_in_target(0, 9, 10, 1, 2));
    }
}

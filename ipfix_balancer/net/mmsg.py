"""Batched UDP system calls: ``recvmmsg`` and ``sendmmsg`` through ctypes over the C library, and UDP
segmentation offload sends (``UDP_SEGMENT``, through ``socket.sendmsg``) for runs of one size.

Python's socket module has neither batch call; one call per datagram cost more CPU than everything else the
balancer does with it. ctypes needs no compiler on the target (docs/performance.md "Performance" says why that was
chosen). ``AVAILABLE`` is False where the C library lacks them (not Linux/glibc or musl): the callers then
keep the one-datagram-per-call path.

Only descriptors and memory are handled here; which slot a datagram goes to is ``core.framing.DatagramSlots``'
decision, what is sent and what a partial send means is ``core.sendqueue.SendQueue``'s.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from itertools import repeat
from operator import add

# A UDP source is a sockaddr_in (16 bytes) or sockaddr_in6 (28): room for either. One socket's family never
# changes and the kernel never writes past the name it gives, so equal slots mean equal sources.
NAME_SIZE = 28
_POINTER = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "I"  # the memoryview format of a pointer/size_t


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t), ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None, None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    recv.restype = send.restype = ctypes.c_int
    return recv, send


_recvmmsg, _sendmmsg = _libc()
AVAILABLE = _recvmmsg is not None

_HDR_SIZE = ctypes.sizeof(_MMsgHdr)
_LEN_AT = _MMsgHdr.msg_len.offset // 4      # as uint32 indexes within one mmsghdr
_NAMELEN_AT = _MsgHdr.msg_namelen.offset // 4
_FAMILY = struct.Struct("=H")
_IN4 = struct.Struct("!H4s")                # port, address (after the family)
_IN6 = struct.Struct("!HI16sI")             # port, flow info, address, scope id (the last in host order)
_UDP = struct.Struct("!HHHH")
_address_of, _from_buffer = ctypes.addressof, ctypes.c_char.from_buffer


def _array(values) -> array.array:
    return array.array(_POINTER, values)


UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux's value (Python 3.11 does not name it)
GSO_SEGMENTS = 64        # UDP_MAX_SEGMENTS: datagrams per segmentation offload send
GSO_MAX_BYTES = 65507    # a run's bytes together fit one IPv4 packet
_SEGMENT = struct.Struct("=H")
_NO_GSO = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})


def _gso_max(sock: socket.socket) -> int:
    """The largest datagram the kernel segments for this connected socket: the path MTU less the IP and
    UDP headers (a segment is never fragmented); 0 when unknown."""
    v6 = sock.family == socket.AF_INET6
    try:
        mtu = sock.getsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                              getattr(socket, "IPV6_MTU", 24) if v6 else getattr(socket, "IP_MTU", 14))
    except OSError:
        return 0
    return max(0, min(GSO_MAX_BYTES, mtu - (48 if v6 else 28)))


def gso_run(lens: list[int], largest: int) -> int:
    """How many datagrams from the first form one segmentation offload send: the same size (at most
    ``largest``), the last one possibly shorter, at most GSO_SEGMENTS and GSO_MAX_BYTES together. 0 when
    fewer than two would."""
    size = lens[0]
    if size > largest or len(lens) < 2 or lens[1] > size:
        return 0
    limit = min(len(lens), GSO_SEGMENTS, GSO_MAX_BYTES // size)
    head = lens[:limit]
    run = limit if head.count(size) == limit else next(i for i, n in enumerate(head) if n != size)
    if run < limit and lens[run] < size:
        run += 1  # a shorter one may end the run
    return run if run > 1 else 0


def gso_start(lens: list[int], largest: int) -> int:
    """Where the next run of datagrams of one size begins (after the first), or the end."""
    for i in range(1, len(lens) - 1):
        if lens[i] == lens[i + 1] <= largest:
            return i
    return len(lens)


def _error() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))  # EAGAIN comes out as BlockingIOError


def _headers(count: int, iov_per_msg: int):
    """``count`` mmsghdrs, each with its own ``iov_per_msg`` iovecs; the iovecs as a flat pointer/size view."""
    hdrs = (_MMsgHdr * count)()
    iovs = (_IoVec * (count * iov_per_msg))()
    for i in range(count):
        hdrs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i * iov_per_msg])
        hdrs[i].msg_hdr.msg_iovlen = iov_per_msg
    return hdrs, iovs, memoryview(iovs).cast("B").cast(_POINTER)


def parse_name(raw: bytes) -> tuple:
    """A sockaddr as Python's ``recvfrom`` gives it: (host, port) or (host, port, flowinfo, scope_id)."""
    family = _FAMILY.unpack_from(raw)[0]
    if family == socket.AF_INET:
        port, addr = _IN4.unpack_from(raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    port, flow, addr, scope = _IN6.unpack_from(raw, 2)
    scope = socket.ntohl(scope)
    host = socket.inet_ntop(socket.AF_INET6, addr)
    if scope:
        try:
            host = f"{host}%{socket.if_indextoname(scope)}"
        except OSError:
            host = f"{host}%{scope}"
    return host, port, flow, scope


class Receiver:
    """``recvmmsg`` on one datagram socket into the slots of a ``core.framing.DatagramSlots``."""

    def __init__(self, sock: socket.socket, slots):
        self.fd = sock.fileno()
        self.slots = slots
        count = slots.count
        self._hdrs, _iovs, self._iovq = _headers(count, 2)  # per datagram: its slot, then its spill area
        self._names = ctypes.create_string_buffer(count * NAME_SIZE)
        self._names_view = memoryview(self._names).cast("B")
        spill = _address_of(_from_buffer(slots.spill))
        names = _address_of(self._names)
        for i in range(count):
            hdr = self._hdrs[i].msg_hdr
            hdr.msg_name = names + i * NAME_SIZE
            hdr.msg_namelen = NAME_SIZE
            _iovs[2 * i].iov_len = slots.slot  # the kernel writes no iovec: only a slot's address changes
            _iovs[2 * i + 1].iov_base = spill + i * slots.spill_size
            _iovs[2 * i + 1].iov_len = slots.spill_size
        self._starts: dict[int, array.array] = {}  # a pooled chunk's address -> its slots' addresses
        self._ints = memoryview(self._hdrs).cast("B").cast("I")
        self._full = memoryview(array.array("I", [NAME_SIZE] * count))
        self._base = _address_of(self._hdrs)
        self.more = False

    def receive(self) -> tuple[list, list]:
        """One ``recvmmsg`` into the free slots: the datagrams (views) and their raw source addresses. Both
        empty when nothing is waiting; another error is raised. ``more`` tells whether it filled every free
        slot (more may be waiting)."""
        slots = self.slots
        if slots.next_read():  # a new chunk: every slot's iovec points into it
            base = _address_of(_from_buffer(slots.chunk))
            starts = self._starts.get(base)
            if starts is None:
                if len(self._starts) >= 4 * slots.pool.keep:  # chunks beyond the pool's keep come and go
                    self._starts.clear()
                size = slots.slot
                starts = self._starts[base] = _array(range(base, base + size * slots.count, size))
            self._iovq[0::4] = starts
        first = slots.first
        n = _recvmmsg(self.fd, self._base + first * _HDR_SIZE, slots.count - first, 0, None)
        self.more = n == slots.count - first
        if n <= 0:
            if n < 0:
                err = _error()
                if not isinstance(err, (BlockingIOError, InterruptedError)):
                    raise err
            return [], []
        ints, step = self._ints, _HDR_SIZE // 4
        start, stop = first * step, (first + n) * step
        lengths = ints[start + _LEN_AT:stop:step].tolist()
        ints[start + _NAMELEN_AT:stop:step] = self._full[:n]  # the kernel wrote the length it used
        names = bytes(self._names_view[first * NAME_SIZE:(first + n) * NAME_SIZE])
        one = names[:NAME_SIZE]
        if names == one * n:  # one source (the common case): no slice per datagram
            return slots.received(lengths), [one] * n
        starts = range(0, n * NAME_SIZE, NAME_SIZE)
        sources = list(map(names.__getitem__, map(slice, starts, map(add, starts, repeat(NAME_SIZE)))))
        return slots.received(lengths), sources


class Sender:
    """``sendmmsg`` on one datagram socket: ``send(bufs)`` -> how many of ``bufs`` (bytes-likes; at most
    ``count`` go per call) the kernel took, oldest first, each one datagram. Raises only when it took none.

    A short count hides the error that stopped it (the kernel reports an error only for the first
    datagram), and that error may be a collector's refusal (ICMP port unreachable) of an earlier datagram,
    which the failed send consumed. So the call after a short count sends one datagram alone: an error
    still pending shows there, and a refusal is noticed one datagram later instead of never.

    ``raw``: (IPv4 header, source port, destination port, destination address) for a raw socket that writes
    the exporter's addresses (source preservation): each datagram then goes out as IP header, UDP header and
    message, to the destination.

    A connected socket sends a run of datagrams of one size (the last may be shorter) as one segmentation
    offload send (``UDP_SEGMENT``, Linux 4.18+): the kernel builds them as one packet and cuts it into
    datagrams at the device, or the NIC does. Collectors get the same datagrams; the handler pays a fifth of
    the CPU per datagram of ``sendmmsg`` (loopback, 1,400 B). All or nothing per run, so no error hides.
    Where the kernel refuses it (older kernel, no checksum offload) and for datagrams beyond the path
    MTU (read at the start) the datagrams go through ``sendmmsg``."""

    def __init__(self, sock: socket.socket, count: int, raw: tuple | None = None):
        self.fd = sock.fileno()
        self.sock = sock
        self.count = count
        self._gso_max = 0 if raw is not None else _gso_max(sock)  # largest datagram a GSO run may have
        self._parts = 1 if raw is None else 3
        self._hdrs, self._iovs, self._iovq = _headers(count, self._parts)
        self._base = _address_of(self._hdrs)
        self._keep: list = []
        self._alone = False  # the last call was short: the next one sends one datagram
        if raw is not None:
            ip, self._ports, (host, _port) = raw[0], raw[1:3], raw[3]
            self._ip = ctypes.create_string_buffer(ip, len(ip))
            self._udp = bytearray(8 * count)  # per datagram its UDP header (the length differs)
            name = ctypes.create_string_buffer(struct.pack("=H", socket.AF_INET) + struct.pack("!H", 0)
                                               + socket.inet_aton(host) + bytes(8), 16)
            self._name = name
            udp = _address_of(_from_buffer(self._udp))
            for i in range(count):
                self._hdrs[i].msg_hdr.msg_name = _address_of(name)
                self._hdrs[i].msg_hdr.msg_namelen = 16
                self._iovs[3 * i].iov_base, self._iovs[3 * i].iov_len = _address_of(self._ip), len(ip)
                self._iovs[3 * i + 1].iov_base, self._iovs[3 * i + 1].iov_len = udp + 8 * i, 8

    def _address(self, buf) -> int:
        try:
            return _address_of(_from_buffer(buf))
        except TypeError:  # read-only (a template message): its bytes, kept alive for the call
            data = bytes(buf)
            self._keep.append(data)
            return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value

    def send(self, bufs) -> int:
        if self._gso_max and not self._alone:
            lens = list(map(len, bufs[:self.count]))
            run = gso_run(lens, self._gso_max)
            if run:
                try:
                    self.sock.sendmsg(bufs[:run], [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(lens[0]))])
                    return run
                except OSError as exc:
                    if exc.errno not in _NO_GSO:
                        raise  # as sendmmsg's would be: EAGAIN, a refusal (nothing of the run was sent)
                    self._gso_max = 0  # the kernel cannot segment here: sendmmsg from now on
            else:
                bufs = bufs[:gso_start(lens, self._gso_max)]  # up to the next run
        return self._send_many(bufs)

    def _send_many(self, bufs) -> int:
        count = 1 if self._alone else min(len(bufs), self.count)
        if count < len(bufs):
            bufs = bufs[:count]
        iovq, parts, address = self._iovq, self._parts, self._address
        at = 2 * (parts - 1)  # the message's iovec within a datagram's
        if parts == 1:
            try:
                iovq[0:2 * count:2] = _array(map(_address_of, map(_from_buffer, bufs)))
            except TypeError:  # a read-only buffer among them
                iovq[0:2 * count:2] = _array(map(address, bufs))
            iovq[1:2 * count:2] = _array(map(len, bufs))
        else:
            pack, sport, dport, udp = _UDP.pack_into, self._ports[0], self._ports[1], self._udp
            for i, buf in enumerate(bufs):
                n = len(buf)
                pack(udp, 8 * i, sport, dport, 8 + n, 0)
                iovq[2 * parts * i + at] = address(buf)
                iovq[2 * parts * i + at + 1] = n
        n = _sendmmsg(self.fd, self._base, count, 0)
        self._keep.clear()
        if n < 0:
            raise _error()
        self._alone = n < count
        return n


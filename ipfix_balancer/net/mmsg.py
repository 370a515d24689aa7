"""Batched UDP system calls: ``recvmmsg`` and ``sendmmsg`` through ctypes over the C library.

Python's socket module has neither; one call per datagram cost more CPU than everything else the balancer
does with it. ctypes needs no compiler on the target (README "Performance" says why that was chosen).
``AVAILABLE`` is False where the C library lacks them (not Linux/glibc or musl): the callers then keep the
one-datagram-per-call path.

Only descriptors and memory are handled here; which slot a datagram goes to is ``core.framing.DatagramSlots``'
decision, what is sent and what a partial send means is ``core.sendqueue.SendQueue``'s.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import os
import socket
import struct
from operator import add

NAME_SIZE = 128  # sockaddr_storage: room for any source address
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
            _iovs[2 * i + 1].iov_base = spill + i * slots.spill_size
            _iovs[2 * i + 1].iov_len = slots.spill_size
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
            base, size = _address_of(_from_buffer(slots.chunk)), slots.slot
            self._iovq[0::4] = _array(range(base, base + size * slots.count, size))
            self._iovq[1::4] = _array([size] * slots.count)
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
        namelens = ints[start + _NAMELEN_AT:stop:step].tolist()
        ints[start + _NAMELEN_AT:stop:step] = self._full[:n]  # the kernel wrote the length it used
        names = bytes(self._names_view[first * NAME_SIZE:(first + n) * NAME_SIZE])
        ends = map(add, range(0, n * NAME_SIZE, NAME_SIZE), namelens)
        sources = list(map(names.__getitem__, map(slice, range(0, n * NAME_SIZE, NAME_SIZE), ends)))
        return slots.received(lengths), sources


class Sender:
    """``sendmmsg`` on one datagram socket: ``send(bufs)`` -> how many of ``bufs`` (bytes-likes, at most
    ``count``) the kernel took, each one datagram. Raises only when it took none.

    A short count hides the error that stopped it (the kernel reports an error only for the first
    datagram), and that error may be a collector's refusal (ICMP port unreachable) of an earlier datagram,
    which the failed send consumed. So the call after a short count sends one datagram alone: an error
    still pending shows there, and a refusal is noticed one datagram later instead of never.

    ``raw``: (IPv4 header, source port, destination port, destination address) for a raw socket that writes
    the exporter's addresses (source preservation): each datagram then goes out as IP header, UDP header and
    message, to the destination."""

    def __init__(self, sock: socket.socket, count: int, raw: tuple | None = None):
        self.fd = sock.fileno()
        self.count = count
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
        count = 1 if self._alone else len(bufs)
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


"""The cached translation layer: physical memory, x86 paging, caches, virtual reads.

Pure and synchronous (no trio here): reads are the hot path of every rule and OS object.
"""

from vmwatch.memory.cache import PidDtbCache as PidDtbCache
from vmwatch.memory.cache import SymbolCache as SymbolCache
from vmwatch.memory.cache import Tlb as Tlb
from vmwatch.memory.guest import GuestMemory as GuestMemory
from vmwatch.memory.paging import Mapping as Mapping
from vmwatch.memory.paging import PagingSpec as PagingSpec
from vmwatch.memory.paging import Walker as Walker
from vmwatch.memory.paging import spec_for as spec_for
from vmwatch.memory.physical import BufferMemory as BufferMemory
from vmwatch.memory.physical import CachedPhysicalMemory as CachedPhysicalMemory
from vmwatch.memory.physical import PhysicalMemory as PhysicalMemory
